"""The clinical knowledge base (rules as data, with sources) and the engine that evaluates it."""

from cnidose.clinical.engine import Alert, Assessment, Due, ExposureAdjustment, assess, egfr, knowledge
from cnidose.clinical.record import SCHEMA, PatientRecord, load_record, parse_record

__all__ = ["SCHEMA", "Alert", "Assessment", "Due", "ExposureAdjustment", "PatientRecord", "assess", "egfr",
           "knowledge", "load_record", "parse_record"]
