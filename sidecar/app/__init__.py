"""The daemon: lifecycle (:mod:`.daemon`), the per-second cycle (:mod:`.pipeline`),
the wall-clock ticker (:mod:`.ticker`), start-up history (:mod:`.bootstrap`) and the
HTTP endpoints (:mod:`.http`)."""
