"""Mail parsing: charsets and RFC 2047 words, header blocks, the MIME walker,
addresses, the `Message` view of one message, HTML text and links, URLs,
archive listings, registered domains, and reading raw messages from files.

Nothing here knows of checks, rules or the engine.
"""
