"""The auditor's tools: export a settlement window to a folder, and verify such a folder.

:mod:`.export` writes and reads a window export (its format is described there);
:mod:`.verify` checks one with nothing but the files (``python -m
clearinghouse.audit.verify <dir>``). The submodules are not imported here, so that
running :mod:`.verify` as a module does not import it twice.
"""
