"""ExportError: an export or composition that cannot be done, said so the user can fix it (a missing network, a
version that exists, parity that failed); `reskd export`, `compose` and `calibrate` exit with it."""


class ExportError(RuntimeError):
    pass
