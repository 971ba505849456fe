"""Pure maths: never imports the store (tests/test_layout.py checks it)."""
