"""Bayesian estimation of individual parameters: MAP, its uncertainty, and the posterior."""

from cnidose.estimation.map import MapResult, fit_map, objective

__all__ = ["MapResult", "fit_map", "objective"]
