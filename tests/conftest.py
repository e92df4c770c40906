"""Test configuration: a small, deadline-free hypothesis profile."""

from hypothesis import settings

settings.register_profile("lars", deadline=None, print_blob=True)
settings.load_profile("lars")
