"""CoARS environments: recommender-user dialogues over real recommendation data."""
