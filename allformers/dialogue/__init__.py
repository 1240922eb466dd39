"""Dialogue systems on the library's LMs: tools and the tool-call protocol (tools.py), passage
retrieval over a local corpus (retrieval.py), LaMDA-style candidate scoring (lamda.py) and
Sparrow-style evidence and reward-model reranking (sparrow.py)."""
