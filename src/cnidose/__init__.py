"""cnidose: calcineurin-inhibitor pharmacokinetics, monitoring and dosing."""

__version__ = "0.1.0"
