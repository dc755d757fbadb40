from announcer.entry import main

main()
