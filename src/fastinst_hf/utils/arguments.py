"""Helpers for the argument parsers of the command line and the scripts."""

import argparse
import os

# More loader workers than this rarely speeds up FastInst's light per-image preprocessing.
MAX_DEFAULT_WORKERS = 4


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only when X says something: not for options without a default
    (None), not for flags (False), and not when the help text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, as PyTorch's DataLoader checks)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers() -> int:
    """Data-loading worker processes by default: one per available CPU, at most MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, available_cpus())
