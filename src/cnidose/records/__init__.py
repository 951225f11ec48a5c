"""Persistence and interchange (NONMEM CSV now; database and FHIR later)."""
