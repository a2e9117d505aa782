"""genssd: generation-time self-selection distillation (Gen-SSD) from a teacher endpoint into a small student."""

__version__ = "0.1.0"
