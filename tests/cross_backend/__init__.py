"""The two backends against each other: steps, recipes, preference, hand-offs, kernel arguments."""
