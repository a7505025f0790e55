"""The one error recipes raise for what a user wrote wrong."""


class RecipeError(ValueError):
    """A recipe that cannot be found or does not make sense, with the reason."""
