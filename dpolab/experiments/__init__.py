"""End-to-end experiments built on dpolab (the GPT-2 Penn experiment lives in ``penn``)."""
