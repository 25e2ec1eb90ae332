"""cai: post-train a base language model into an instruction follower, with invariants that decide whether a run counts."""

__version__ = "0.1.0"
