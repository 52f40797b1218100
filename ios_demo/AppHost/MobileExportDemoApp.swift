// Never compiled: written without Xcode (see ios_demo/README.md).
//
// The app target's entry point (not part of the Swift package: a library has no @main).
// With the package's sources compiled into the app target itself, the import below names the
// app's own module and Swift ignores it with a warning.
import MobileExportDemo
import SwiftUI

@main
struct MobileExportDemoApp: App {
    var body: some Scene {
        WindowGroup {
            BundlePickerView()
        }
    }
}
