"""Scripts the tests launch in subprocesses (torchrun or plain python), run as modules from the repository
root: ``python -m tests.dist.<name>`` / ``torchrun --nproc_per_node 2 -m tests.dist.<name>`` (see tests/helpers.py)."""
