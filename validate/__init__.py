"""Checking deployed GPTMeg models against the eager one: the graph contract checker (more to come)."""

from .graph_contract import GraphFileError, check_graph_file

__all__ = ["GraphFileError", "check_graph_file"]
