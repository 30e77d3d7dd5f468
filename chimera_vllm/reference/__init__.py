"""The reference decoder on transformers: target loading, sampling, speculative decoding over chains and trees."""
