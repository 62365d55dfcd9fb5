from milterguard.cli import console_main

console_main()
