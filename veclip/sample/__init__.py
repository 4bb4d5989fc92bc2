"""Sample data: rendered scenes with countable facts and web-like AltText."""

from veclip.sample.generate import SampleConfig, generate

__all__ = ["SampleConfig", "generate"]
