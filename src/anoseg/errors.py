"""The project's own error types: anything a user did wrong surfaces as one of these."""


class AnosegError(Exception):
    """Base class for errors caused by user input (paths, files, settings).

    The CLI prints these as one line and exits with status 2, without a traceback.
    """


class DataError(AnosegError):
    """A data folder, image or mask cannot be used."""


class ConfigError(AnosegError):
    """A setting or a saved configuration is invalid."""


class ModelFileError(AnosegError):
    """A saved model or checkpoint is missing, damaged or does not fit the configuration."""


class OutputError(AnosegError):
    """An output file cannot be written (disk full, no permission, a file where a folder should be)."""


class ImageError(DataError):
    """An image that cannot be used; `reason` is one of empty, not_image, damaged, no_pixels, too_large."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# A parent process (train-all) names a file here; a child that fails writes its error to it as JSON.
ERROR_FILE_ENV = "ANOSEG_ERROR_FILE"
