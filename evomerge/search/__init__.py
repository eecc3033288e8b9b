"""Running a search: the in-process loop (propose, merge in place, evaluate, tell)."""

from evomerge.search.loop import EvaluatorSuite, InProcessSearch, SearchResult, Trial

__all__ = ["EvaluatorSuite", "InProcessSearch", "SearchResult", "Trial"]
