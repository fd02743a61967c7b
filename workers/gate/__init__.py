"""The quality gate: checks that compare a candidate against production on a holdout."""

from workers.gate.checks import CHECKS, CheckResult, GateContext, GateError, GateReport, gate_check, run_gate

__all__ = ["CHECKS", "CheckResult", "GateContext", "GateError", "GateReport", "gate_check", "run_gate"]
