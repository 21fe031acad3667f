"""Kept for scripts that still ``from machine import machine``: the description lives in bench/common.py."""

from common import machine  # noqa: F401
