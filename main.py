#!/usr/bin/env python3
"""vramchat: chat with a local LLM about very long documents. `python main.py --help`."""
import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
