"""``python -m seq2seq`` (and ``torchrun -m seq2seq``) runs the command line."""

from seq2seq.cli import main

if __name__ == "__main__":
    main()
