"""One inference engine behind KServe and Triton."""
