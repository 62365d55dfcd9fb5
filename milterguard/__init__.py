"""milterguard: an anti-spam and anti-phishing milter for Postfix and Sendmail."""

__version__ = "0.1.0"
