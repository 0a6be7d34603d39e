from labmetal.agent.main import main

main()
