"""The daemon: lifecycle (:mod:`.daemon`), the per-second cycle (:mod:`.pipeline`) and
its stages (:mod:`.router`, :mod:`.symbol_state`, :mod:`.writer`, :mod:`.history`),
the wall-clock ticker (:mod:`.ticker`), start-up history (:mod:`.bootstrap`) and the
HTTP endpoints (:mod:`.http`)."""
