"""The clinical core: pure functions from readings and context to a patient's assessment.

No I/O, no state, no clock here: every source (paged search, CDS Hooks prefetch, …) feeds it, and every
output (writeback, cards, report) renders what it returns."""
