"""The built-in demo: a tokenizer and a small Llama trained on the bundled TOFU text, and the recipe that caches them."""
