"""Launchers: how workers are started. One module per launcher behind ``base.Launcher``."""
