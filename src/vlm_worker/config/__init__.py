"""Configuration: the settings table, engine arguments and the model source, all from the environment."""
