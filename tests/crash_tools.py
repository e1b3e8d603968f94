"""Tools and scripted models for the crash tests (tests/runtime/test_crash.py)."""
