"""User-facing errors. Every message says what to change."""


class QtoolError(Exception):
    """A problem with the user's input (recipe, model, data, paths) that they can fix."""


class RecipeError(QtoolError):
    """A recipe that does not validate; the message names the key, the line and what is allowed."""
