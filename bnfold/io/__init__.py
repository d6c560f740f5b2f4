"""Models on disk: reading and validating them (:mod:`.load`), where their tensors' values live
(:mod:`.store`), and writing results atomically (:mod:`.save`)."""
