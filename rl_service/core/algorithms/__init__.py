"""What trains: registry.py maps names to algorithms with hyperparameters.py's typed schemas; reinforce.py is
REINFORCE as a stable-baselines3 algorithm, reinforce_update.py the update it shares with named policies, and
networks.py the policy networks both use."""
