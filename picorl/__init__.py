"""picoRL: a small, readable pipeline that post-trains LLMs with reinforcement learning."""
