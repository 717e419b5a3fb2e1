from hwprune.device import main

main()
