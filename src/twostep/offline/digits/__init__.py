"""The offline world: real 8x8 digits, a local text encoder, an evaluator. See README.md here."""
