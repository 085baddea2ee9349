"""Translation example: a small Marian encoder-decoder Transformer trained from scratch, BLEU on greedy and beam output."""
