"""mtpo: multi-turn preference optimization (M-DPO, M-KTO, masked SFT) for tool-using LLM agents."""

__version__ = "0.1.0"
