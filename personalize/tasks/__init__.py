"""Tasks: how an item becomes retrieval text and a prompt (LaMP's templates), and prompts in a budget."""
