"""Rewards: math answer grading, verdict / math / code reward functions, and the code sandbox."""
