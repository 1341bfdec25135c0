"""Helpers the test suite shares: its own Gymnasium environments."""
