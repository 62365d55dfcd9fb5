"""Stores of what the filter learns or is told: Bayes token counts
(`bayes`), the classifier's model (`models`), content hashes of reported
spam (`hashes`) and the allow and block lists (`lists`).

Stores sit on the clients (Redis) or on files; checks and the CLI use them.
"""
