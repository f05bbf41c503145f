"""seq2seq: GNMT-style LSTM encoder-decoders with attention and character-level LMs."""

__version__ = "0.1.0"
