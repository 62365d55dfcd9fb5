"""The envelope the benchmark scripts give each message, as `milterguard bench` does.

It lives here, not in the package, because the scripts that take --checkout drive
other source trees with it, trees that need not have any given name of this one.
"""


class BenchEnv:
    ip = "198.51.100.20"
    client_name = "mail.example.net"
    helo = "mail.example.net"
    mail_from = None
    rcpt = ["user@example.org"]
    auth = ""
