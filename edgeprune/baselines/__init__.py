"""Baselines on the same graph, masks and ablation as Edge Pruning: EAP, EAP-IG, ACDC, circuit
selection from scores, faithfulness curves (CPR/CMD) and equal-size comparisons."""

from .acdc import AcdcResult, acdc
from .attribution import eap_ig_scores, eap_scores
from .compare import compare
from .curve import areas, check_budgets, faithfulness_curve, plot_curve
from .methods import attribute
from .scores import Scores, ScoresError, check_graph, load_scores, save_scores
from .selection import circuit_of_size, edge_order, select_threshold, select_top

__all__ = ["AcdcResult", "Scores", "ScoresError", "acdc", "areas", "attribute", "check_budgets", "check_graph",
           "circuit_of_size", "compare", "eap_ig_scores", "eap_scores", "edge_order", "faithfulness_curve",
           "load_scores", "plot_curve", "save_scores", "select_threshold", "select_top"]
